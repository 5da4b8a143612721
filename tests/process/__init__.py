"""twistd lgmt-proxy spawned as a child process (signals, exit status, rollouts)."""
