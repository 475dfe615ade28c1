"""The networks: patch encoders, TransMIL/ABMIL aggregators, MIL heads, text/gene encoders, report decoder."""
