#!/bin/sh
# /usr/bin/vicifast-agent: run the agent from its private venv (see packaging/README.md).
# -I: a root command must not pick up PYTHON* variables, the user's site-packages or modules
# from the current directory.
exec /usr/lib/vicifast-agent/bin/python3 -I -m agent "$@"
