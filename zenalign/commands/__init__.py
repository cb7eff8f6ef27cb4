"""The ``zenalign`` command and what its subcommands run: sweep, export, train-rm,
critique-revise and plot."""
