"""`python -m strata` runs the command-line interface."""

from strata.cli.app import main

if __name__ == "__main__":
    main()
