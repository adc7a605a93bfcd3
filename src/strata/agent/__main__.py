"""`python -m strata.agent`: the lean agent process that `strata agent` execs into."""

from strata.agent.main import main

if __name__ == "__main__":
    main()
