"""Pure functions, no reactor: each test calls the code and checks the value."""
