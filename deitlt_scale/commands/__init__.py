"""Subcommands of ``deitlt``; see deitlt_scale/cli.py for the contract each module follows."""
