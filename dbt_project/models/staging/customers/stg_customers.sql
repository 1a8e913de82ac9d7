-- One row per customer. Re-delivered customers (same customer_id loaded again) keep the latest load.
with parsed as (
    select
        cast({{ json_str('record', 'customer_id') }} as bigint) as customer_id,
        {{ json_str('record', 'name') }} as customer_name,
        {{ json_str('record', 'email') }} as email,
        cast({{ json_str('record', 'created_at') }} as timestamp) as created_at,
        _file as source_file,
        _loaded_at as loaded_at
    from {{ source('customers', 'customers') }}
),

ranked as (
    select
        *,
        row_number() over (
            partition by customer_id order by loaded_at desc, source_file desc
        ) as delivery_rank
    from parsed
)

select customer_id, customer_name, email, created_at, source_file, loaded_at
from ranked
where delivery_rank = 1
