"""Reporting: renders results that training and evaluation wrote."""
