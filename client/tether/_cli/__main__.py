"""``python -m tether._cli``: the same as the ``tether`` console script."""

from tether._cli import run

run()
