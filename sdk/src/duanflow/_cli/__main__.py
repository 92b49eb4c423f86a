"""``python -m duanflow._cli``: the ``duanflow`` command without its console script."""

from duanflow._cli.main import main

main()
