"""The team pages, under ``/team/`` (see ``billing.views``)."""

from django.urls import path

from billing import views

urlpatterns = [
    path("", views.team_index, name="team-index"),
    path("<slug:slug>/", views.team_page, name="team-page"),
    path("<slug:slug>/statements/<str:month>/", views.team_statement, name="team-statement"),
    path("<slug:slug>/statements/<str:month>.<str:fmt>", views.team_statement_export, name="team-statement-export"),
]
