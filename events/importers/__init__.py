"""Importers of real data sets: parse a source file into events, report rejected rows, produce."""
