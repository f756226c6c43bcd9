"""The ``emailq`` command line: an app on top of the core (``main`` parses and runs,
``commands`` does the work against a ``Queue``, ``output`` prints it for people or as JSON).
"""
