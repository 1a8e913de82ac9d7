-- One row per customer with their order history; customers without orders get zeros.
with order_totals as (
    select
        customer_id,
        count(*) as order_count,
        sum(amount) as total_amount,
        min(ordered_at) as first_ordered_at,
        max(ordered_at) as last_ordered_at
    from {{ ref('stg_orders') }}
    group by customer_id
)

select
    customers.customer_id,
    customers.customer_name,
    customers.email,
    coalesce(order_totals.order_count, 0) as order_count,
    coalesce(order_totals.total_amount, 0) as total_amount,
    order_totals.first_ordered_at,
    order_totals.last_ordered_at
from {{ ref('stg_customers') }} as customers
left join order_totals
    on customers.customer_id = order_totals.customer_id
