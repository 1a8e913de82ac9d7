{#
  Read one top-level key of a raw JSON record as text.

  Raw tables hold each input line in a `record` column (DuckDB JSON, Snowflake VARIANT).
  Staging models read JSON only through these macros, so the same models compile on both
  warehouses; callers cast the text to the type they want.
#}

{% macro json_str(column, key) -%}
  {{ return(adapter.dispatch('json_str', 'postload_demo')(column, key)) }}
{%- endmacro %}

{% macro default__json_str(column, key) -%}
  json_value({{ column }}, '$.{{ key }}')
{%- endmacro %}

{% macro duckdb__json_str(column, key) -%}
  json_extract_string({{ column }}, '$.{{ key }}')
{%- endmacro %}

{% macro snowflake__json_str(column, key) -%}
  {{ column }}:"{{ key }}"::varchar
{%- endmacro %}
