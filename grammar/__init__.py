"""The KQL grammar (kql.lark), shipped as package data of ``kql.grammar``."""
