"""``python -m duanflow._local up|status|down``: the ``duanflow dev`` commands without the full CLI."""

from duanflow._cli.dev import main

main()
