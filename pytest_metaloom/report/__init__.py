"""Reports read outcomes and compute nothing new: the table and the JSON document."""
