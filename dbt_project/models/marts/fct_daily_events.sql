-- One row per day: event counts by type and distinct active customers.
select
    cast(occurred_at as date) as event_date,
    count(*) as event_count,
    count(case when event_type = 'page_view' then 1 end) as page_view_count,
    count(case when event_type = 'add_to_cart' then 1 end) as add_to_cart_count,
    count(case when event_type = 'checkout' then 1 end) as checkout_count,
    count(distinct customer_id) as active_customer_count,
    max(loaded_at) as last_loaded_at
from {{ ref('stg_events') }}
group by 1
