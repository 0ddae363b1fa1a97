"""Per-user models (encrypted files under $AGENT_HOME/models, the active one per user) and pairing
of browser extensions with the local service (one-time codes and bearer tokens, both stored hashed).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Adds the models' file and report, each user's active model, and the two pairing tables."""
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('file', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('report', sa.Text(), nullable=True))
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('active_model_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_users_active_model_id_models'), 'models',
                                    ['active_model_id'], ['id'], ondelete='SET NULL')
    op.create_table('pairing_codes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('code_hash', sa.String(length=64), nullable=False),
    sa.Column('created', sa.String(length=32), nullable=False),
    sa.Column('expires', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_pairing_codes_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pairing_codes')),
    sa.UniqueConstraint('code_hash', name=op.f('uq_pairing_codes_code_hash'))
    )
    op.create_table('tokens',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('origin', sa.String(length=200), nullable=True),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created', sa.String(length=32), nullable=False),
    sa.Column('last_used', sa.String(length=32), nullable=True),
    sa.Column('revoked', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_tokens_token_hash'))
    )


def downgrade() -> None:
    """Drops the pairing tables and the model columns."""
    op.drop_table('tokens')
    op.drop_table('pairing_codes')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_users_active_model_id_models'), type_='foreignkey')
        batch_op.drop_column('active_model_id')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('report')
        batch_op.drop_column('file')
