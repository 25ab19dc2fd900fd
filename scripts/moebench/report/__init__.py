"""The report: runs.py reads a run (rows as per-arm series, with provenance ids); draw.py the shared drawing and
sizes; figures.py the per-run figures; tiers.py the cross-run tier comparison; tables.py the shared HTML/CSS and rst
tables (the claims ledger uses them too) and the table pages; pages.py the page set and command line
(`python -m moebench.report`); configdoc.py config/README.md; readme.py README.md and docs/results.md from
provenance; recipe_page.py the recipe's Markdown and HTML pages and their snippets."""
