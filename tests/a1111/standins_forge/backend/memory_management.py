"""backend.memory_management of Forge (a1111.md "Training from a tab": the UNet patcher
p.sd_model.forge_objects.unet is loaded with load_model_gpu before its model is called). Forge may
unload a model to make room for another (the text encoder, loaded by get_learned_conditioning), so
a caller loads the UNet after encoding. The stand-in records the calls and the loaded patcher."""
loaded = []  # patchers, in load order
current = None


def load_model_gpu(model):
    global current
    loaded.append(model)
    current = model
    model.loaded = True


def unload_all_models():
    global current
    if current is not None:
        current.loaded = False
    current = None
