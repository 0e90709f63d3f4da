"""`python -m evals.fidelity`: see `evals.fidelity.run`."""

from evals.fidelity.run import main

if __name__ == "__main__":
    main()
