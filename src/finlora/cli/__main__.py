"""`python -m finlora.cli`: the same command line as `finlora`."""

from finlora.cli import main

if __name__ == "__main__":
    main()
