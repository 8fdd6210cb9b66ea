"""Pictures of a search and its result (matplotlib, headless).

One module a picture; each draws from plain data (policy dicts, arrays,
result JSONs) and imports nothing from mmengine, so the tools under
``tools/visualization`` and ``tools/analysis`` stay thin.
"""
