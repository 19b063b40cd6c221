"""The offline world: procedural Shapes scenes, their checker, the tiny model trained on them, its evaluation.

Nothing here imports the rest of scedit_ui (only `tuners.validation`, for its errors): changing a render here
invalidates assets/tiny-sd and the shipped tuners, so this package is kept apart from the product.
"""
