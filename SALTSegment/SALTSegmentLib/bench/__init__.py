"""``saltsegment bench``: the numbers behind the defaults, reproducible by one command each.

``speed`` (:mod:`.speed`) times the methods against each other in one process;
``quality`` (:mod:`.quality`) scores few-shot propagation against Slicer's
Fill between slices on the cases of :mod:`.cases`.
"""
