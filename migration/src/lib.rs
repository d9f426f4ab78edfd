//! Live migration of Veil guests between hosts. Not implemented yet; see the project's issues.
