"""Pieces shared by several op families."""
