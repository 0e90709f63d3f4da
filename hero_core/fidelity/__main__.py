"""`python -m hero_core.fidelity`: see `hero_core.fidelity.run`."""

from hero_core.fidelity.run import main

if __name__ == "__main__":
    main()
