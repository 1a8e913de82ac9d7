-- One row per event. Re-delivered events (same event_id loaded again) keep the latest load.
with parsed as (
    select
        {{ json_str('record', 'event_id') }} as event_id,
        cast({{ json_str('record', 'customer_id') }} as bigint) as customer_id,
        {{ json_str('record', 'event_type') }} as event_type,
        cast({{ json_str('record', 'occurred_at') }} as timestamp) as occurred_at,
        _file as source_file,
        _loaded_at as loaded_at
    from {{ source('events', 'events') }}
),

ranked as (
    select
        *,
        row_number() over (
            partition by event_id order by loaded_at desc, source_file desc
        ) as delivery_rank
    from parsed
)

select event_id, customer_id, event_type, occurred_at, source_file, loaded_at
from ranked
where delivery_rank = 1
