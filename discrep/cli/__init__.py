"""The ``discrep`` command line: one small module per command, ``main`` on top.

Layout (after borg 2's ``archiver/``): each ``*_cmd.py`` declares its arguments
(``register(sub)``), turns them into typed options and calls the wiring layer
(``run(a, warnings)``), and may say how its result reads for a person
(``show(a, res)``).  ``main.py`` builds the parser from ``COMMANDS``, configures
logging, and is the one error handler.  A new command is one new module plus
its line in ``main.COMMANDS``.

Only this package configures logging and writes to stdout/stderr.
Thread-safety: the CLI runs in the main thread.
"""
