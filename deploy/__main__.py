"""`python -m deploy` runs the `tubescope` command line (the same as the console script)."""
from deploy.cli import main

main()
