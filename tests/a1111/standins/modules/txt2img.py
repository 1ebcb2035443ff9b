"""modules.txt2img / img2img: the UI's generate function builds p, then runs it inside
`with closing(p):` -- so p.close() runs even when generation raises (a1111.md "Changing the
conditioning": p.c / p.uc are dropped there). The stand-in takes a ready p."""
from contextlib import closing

from modules import processing


def txt2img_function(p):
    with closing(p):
        return processing.process_images(p)


img2img_function = txt2img_function
