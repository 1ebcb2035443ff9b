"""Testbed: a small, really trained text-to-image model (SD1.5 checkpoint format) on procedurally
generated images of coloured shapes, an attribute judge, and the quality table that CFG, DICE and
TeEFusion are compared on. See testbed/README.md."""
