"""`python -m lozo_exp.kshot`: build LM-BFF k-shot splits (see `medium_models.kshot`)."""

from medium_models.kshot import main

if __name__ == "__main__":
    main()
