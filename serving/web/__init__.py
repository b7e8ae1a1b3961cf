"""Server-rendered pages of the risk service (Jinja2 templates, inline SVG, no JavaScript)."""
