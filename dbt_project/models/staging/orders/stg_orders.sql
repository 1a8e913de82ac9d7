-- One row per order. Re-delivered orders (same order_id loaded again) keep the latest load,
-- so a status change (placed -> shipped -> returned) arrives as a re-delivery.
with parsed as (
    select
        cast({{ json_str('record', 'order_id') }} as bigint) as order_id,
        cast({{ json_str('record', 'customer_id') }} as bigint) as customer_id,
        cast({{ json_str('record', 'amount') }} as decimal(12, 2)) as amount,
        {{ json_str('record', 'status') }} as status,
        cast({{ json_str('record', 'ordered_at') }} as timestamp) as ordered_at,
        _file as source_file,
        _loaded_at as loaded_at
    from {{ source('orders', 'orders') }}
),

ranked as (
    select
        *,
        row_number() over (
            partition by order_id order by loaded_at desc, source_file desc
        ) as delivery_rank
    from parsed
)

select order_id, customer_id, amount, status, ordered_at, source_file, loaded_at
from ranked
where delivery_rank = 1
