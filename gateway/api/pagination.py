"""Pagination: page numbers for the small tables, cursors (no COUNT) for the large ones."""

from __future__ import annotations

from rest_framework import pagination


class PageNumberPagination(pagination.PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class CursorPagination(pagination.CursorPagination):
    """For usage and statements: never counts the table, stable under inserts."""

    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000
    ordering = ("-period_start", "-id")


#: Ids in detail URLs: anything else is a 404 from the router, never a failed integer cast.
ID_PATTERN = "[0-9]+"
