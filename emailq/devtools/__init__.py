"""Development tooling on top of the core: the ``emailq dev`` runner (``runner``), its SMTP
capture server (``capture``) and the Redis it can start (``redis_server``). Never imported
by the API or the worker."""
