"""Initial schema: users, keys (public parts), models and protections (the signed records).

Revision ID: 0001
Revises:
Create Date: 2026-11-22

The record format itself (which fields are signed and how) is specified in records/README.md;
a later change to it is a new record format version, not only a migration.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Creates the four tables and their indexes."""
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('created', sa.String(length=32), nullable=False),
    sa.Column('public_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('head_seq', sa.Integer(), server_default='0', nullable=False),
    sa.Column('head_hash', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('created', sa.String(length=32), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_keys_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_keys')),
    sa.UniqueConstraint('user_id', 'key_id', name=op.f('uq_keys_user_id_key_id'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('encrypted', sa.Boolean(), nullable=False),
    sa.Column('created', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_models_user_id_users'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models'))
    )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_models_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_models_user_id'), ['user_id'], unique=False)

    op.create_table('protections',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('time', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('file_name_enc', sa.LargeBinary(), nullable=True),
    sa.Column('site_enc', sa.LargeBinary(), nullable=True),
    sa.Column('original_sha256', sa.String(length=64), nullable=False),
    sa.Column('protected_sha256', sa.String(length=64), nullable=False),
    sa.Column('phash', sa.String(length=16), nullable=False),
    sa.Column('original_width', sa.Integer(), nullable=False),
    sa.Column('original_height', sa.Integer(), nullable=False),
    sa.Column('working_width', sa.Integer(), nullable=False),
    sa.Column('working_height', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('model_sha256', sa.String(length=64), nullable=False),
    sa.Column('rgan_key_id', sa.String(length=16), nullable=False),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('psnr', sa.Float(), nullable=True),
    sa.Column('self_check_asr', sa.Float(), nullable=True),
    sa.Column('prev_hash', sa.String(length=64), nullable=True),
    sa.Column('record_hash', sa.String(length=64), nullable=False),
    sa.Column('signature', sa.LargeBinary(length=64), nullable=False),
    sa.CheckConstraint("source IN ('cli', 'extension')", name=op.f('ck_protections_source')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_protections_model_id_models'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_protections_user_id_users'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_protections')),
    sa.UniqueConstraint('user_id', 'seq', name=op.f('uq_protections_user_id_seq'))
    )
    with op.batch_alter_table('protections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_protections_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_protections_original_sha256'), ['original_sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_protections_protected_sha256'), ['protected_sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_protections_record_hash'), ['record_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_protections_time'), ['time'], unique=False)



def downgrade() -> None:
    """Drops everything (the log is lost: only for development)."""
    with op.batch_alter_table('protections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_protections_time'))
        batch_op.drop_index(batch_op.f('ix_protections_record_hash'))
        batch_op.drop_index(batch_op.f('ix_protections_protected_sha256'))
        batch_op.drop_index(batch_op.f('ix_protections_original_sha256'))
        batch_op.drop_index(batch_op.f('ix_protections_model_id'))

    op.drop_table('protections')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_user_id'))
        batch_op.drop_index(batch_op.f('ix_models_sha256'))

    op.drop_table('models')
    op.drop_table('keys')
    op.drop_table('users')
