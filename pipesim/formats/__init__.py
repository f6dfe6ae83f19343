"""Result objects rendered for people and programs, in one place.

`text` (tables for the terminal), `jsondata` (the `--json` layouts, plain dicts)
and `markdown` (the report page). Domain modules return result objects and
know nothing of these layouts; every command and the runner render through here.
"""
