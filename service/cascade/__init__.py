"""The cascade: a Radiograph → model input → classify → gate → segment → the film's mask → a `Finding`.

One flow (`flow.Flow`) for the served path (async model calls through the worker) and the in-process
cascade (training's evaluation, tests). Imports imaging and models.
"""
