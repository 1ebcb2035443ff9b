"""Stand-in marker of Forge (tests only): Forge, reForge and Forge-classic ship a `modules_forge`
package. With it importable, the stand-in processing behaves like Forge (a1111.md "One pass per
step at CFG 1"): at cfg 1 the negative prompt is never encoded (p.uc is None, text_uncond is None
in the callback) and the sampling function skips the negative pass by itself."""
