-- One row per order with the customer's name. Left join: an order can land before its customer.
select
    orders.order_id,
    orders.customer_id,
    customers.customer_name,
    orders.amount,
    orders.status,
    orders.ordered_at,
    orders.loaded_at
from {{ ref('stg_orders') }} as orders
left join {{ ref('stg_customers') }} as customers
    on orders.customer_id = customers.customer_id
