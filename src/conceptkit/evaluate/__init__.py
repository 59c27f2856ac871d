"""`conceptkit evaluate`: the papers' measurements of slider sets, image folders and sub-concepts."""
