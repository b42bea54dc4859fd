"""The HTTP side: routes, request bodies, the worklist API, answer schemas, bearer auth, de-identified answers.

Imports the cascade and the store; the BentoML services in `service.app` mount its router.
"""
