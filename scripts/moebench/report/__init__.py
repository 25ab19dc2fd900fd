"""The report: figures (figures.py), tables and the shared HTML/CSS (tables.py), pages across runs (pages.py),
config/README.md (configdoc.py) and the README/docs results rendered from provenance (readme.py)."""
