"""Pictures of a conversion: the block-level dataflow before and after the passes, the Skiparse
token patterns of one frame, attention FLOPs and communication, as self-contained SVG and HTML.

SVG is written as plain strings (`svg.py`), so the pictures need nothing beyond the standard
library and networkx, and a page opens anywhere without a server or a plotting package.
`page.write_report(report, config, ...)` writes the HTML page and the SVG files.
"""
