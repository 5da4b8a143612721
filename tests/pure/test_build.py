"""The build under test is the one meant: in CI's run against `make
venv-compiled` (``LGMT_PROXY_MYPYC=1``) every module setup.py compiles is
imported as an extension, so the suite checks the compiled data plane, not
the sources beside it; in the pure run every module is Python source."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support.build import (
    ROOT,
    compiled_modules,
    expect_compiled,
    imported_files,
    package_modules,
    wrong_kind,
)


class BuildTests(TestCase):
    def test_compiled_list_names_package_modules(self) -> None:
        """Every file setup.py compiles exists (a renamed module would
        otherwise fail the image's build only)."""
        compiled = compiled_modules()
        self.assertIn("lgmt_proxy.dataplane.inbound", compiled)
        self.assertEqual([m for m in compiled if m not in package_modules()], [])

    def test_wrong_kind_finder(self) -> None:
        """The finder flags a source where an extension is expected and the
        other way round."""
        files = {
            "p.hot": "/v/p/hot.cpython-311-x86_64-linux-gnu.so",
            "p.cold": "/v/p/cold.py",
            "p.also": "/t/p/also.py",
        }
        self.assertEqual(
            wrong_kind(files, {"p.hot", "p.also"}, expect=True), ["p.also: /t/p/also.py"]
        )
        self.assertEqual(
            wrong_kind(files, {"p.hot", "p.also"}, expect=False),
            ["p.hot: /v/p/hot.cpython-311-x86_64-linux-gnu.so"],
        )

    def test_imported_build_is_the_expected_one(self) -> None:
        files = imported_files()
        self.assertEqual(wrong_kind(files, set(compiled_modules()), expect_compiled()), [])
        if not expect_compiled():
            # The pure run imports this tree's sources (the editable install).
            inbound = Path(files["lgmt_proxy.dataplane.inbound"]).resolve()
            self.assertEqual(inbound, ROOT / "lgmt_proxy" / "dataplane" / "inbound.py")
