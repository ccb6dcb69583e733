"""Reports of a sweep's store: cells and layout, plots, Markdown/HTML markup, the report writer (reads only)."""
