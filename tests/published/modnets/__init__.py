"""Stand-in for the piggyback authors' ``modnets`` package (its masked layers)."""
