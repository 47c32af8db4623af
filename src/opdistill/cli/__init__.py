"""The ``opd`` command: its subcommands and the embedded demo."""
