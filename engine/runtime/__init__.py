"""The engine at run time: the executor and its handler table, fair compute turns, what a handler runs with
(context, model cache, devices, model locations, the rules on loading kwargs)."""
